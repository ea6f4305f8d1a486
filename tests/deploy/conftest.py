"""Markers of the deployment tests."""


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "compose: builds images and runs docker-compose.yml for real (podman)"
    )
