"""Root fixtures: each area's shared fixtures live in a module under tests/support."""

pytest_plugins = [
    "tests.support.nats",
    "tests.support.speech",
    "tests.support.llama",
    "tests.support.workers",
    "tests.support.gateway",
]
