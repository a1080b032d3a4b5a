"""Client for the gateway's channel pub/sub at ``/ws/channels`` (the seed's ``WebSocketService``)."""

from voice_channels.client import CHANNEL_NAME, DEFAULT_URI, WebSocketService
from voice_channels.messages import (
    ChannelConnectionError,
    ChannelError,
    ChannelMessage,
    ChannelSendError,
    ChannelSubscriptionError,
    MessageStream,
)

__all__ = [
    "CHANNEL_NAME",
    "DEFAULT_URI",
    "ChannelConnectionError",
    "ChannelError",
    "ChannelMessage",
    "ChannelSendError",
    "ChannelSubscriptionError",
    "MessageStream",
    "WebSocketService",
]
