"""Payment providers, chosen by URL: ``dev://`` (default, no money moves) or ``stripe://`` (its keys
come from their own settings, ``AGENTCHAT_STRIPE_*``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from agentchat.config import Settings
from agentchat.payments.base import PaymentProvider


def provider_from_settings(settings: Settings) -> PaymentProvider:
    scheme = urlsplit(settings.payments).scheme
    if scheme == "dev":
        from agentchat.payments.dev import DevPayments

        return DevPayments()
    if scheme == "stripe":
        from agentchat.payments.stripe import StripePayments  # imports stripe only when it is used

        return StripePayments(
            secret_key=settings.stripe_secret_key,
            publishable_key=settings.stripe_publishable_key,
            webhook_secret=settings.stripe_webhook_secret,
            api_base=settings.stripe_api_base,
        )
    raise ValueError(f"payments {settings.payments!r}: use dev:// or stripe://")
