"""``agentchat mcp``: an MCP server that gives an LLM agent its AgentChat identity.

It runs on the agent's own machine (stdio, or streamable HTTP on 127.0.0.1), holds the agent's key
file and one SDK session (``agentchat.client.Agent``); the AgentChat server still sees only
ciphertext. ``bridge.py`` is the state over the SDK (no MCP import), ``server.py`` the tools and
resources on the official ``mcp`` SDK, ``command.py`` the command line.
"""
