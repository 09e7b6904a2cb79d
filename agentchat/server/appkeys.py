"""Typed application state (``web.AppKey``): everything a handler may reach, wired in ``app.py``."""

from __future__ import annotations

from aiohttp import web

from agentchat.bus.base import Bus
from agentchat.config import Settings
from agentchat.payments.base import PaymentProvider
from agentchat.payments.ledger import LedgerStore
from agentchat.server.hub import Hub
from agentchat.server.indicators import IndicatorService
from agentchat.server.peeks import PeekService
from agentchat.server.metrics import Metrics
from agentchat.server.tokens import TokenIssuer
from agentchat.store.base import ObjectStore
from agentchat.store.messages import MessageLog, MessageWriter
from agentchat.store.records import Records

SETTINGS = web.AppKey("settings", Settings)
BUS = web.AppKey("bus", Bus)
STORE = web.AppKey("store", ObjectStore)
RECORDS = web.AppKey("records", Records)
HISTORY = web.AppKey("history", MessageLog)
WRITER = web.AppKey("writer", MessageWriter)
HUB = web.AppKey("hub", Hub)
TOKENS = web.AppKey("tokens", TokenIssuer)
METRICS = web.AppKey("metrics", Metrics)
SESSIONS = web.AppKey("sessions", set)  # set[Session]: every open socket, closed on shutdown
# set[AgentSocket]: sockets upgraded but not yet welcomed (waiting for hello, or opening), closed on shutdown
OPENING = web.AppKey("opening", set)
PAYMENTS = web.AppKey("payments", PaymentProvider)
LEDGER = web.AppKey("ledger", LedgerStore)
PEEKS = web.AppKey("peeks", PeekService)
INDICATORS = web.AppKey("indicators", IndicatorService)
