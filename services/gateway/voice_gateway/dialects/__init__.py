"""One module per wire protocol, each a translation between its messages and the conversation core, over
the shared socket loop of :mod:`voice_gateway.dialects.base`. How to add one: docs/architecture.md."""
