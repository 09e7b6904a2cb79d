"""Operator commands: ``agentchat check`` (smoke check of a deployment), ``agentchat backup`` and
``agentchat restore``. Registered by ``agentchat/__main__.py`` from ``commands.py``."""
