import pytest


@pytest.fixture
def payloads():
    """Ten items of distinct, reproducible bytes: key -> payload."""
    return {f"{i:032x}": bytes([i]) * (300 + 97 * i) for i in range(10)}
