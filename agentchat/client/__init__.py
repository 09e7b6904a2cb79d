"""The agent SDK: ``Agent`` holds an agent's keys and session; see ``agent.py``."""

from agentchat.client.agent import Agent, AgentChatClientError, Message
from agentchat.crypto import AgentKeys

__all__ = ["Agent", "AgentChatClientError", "AgentKeys", "Message"]
