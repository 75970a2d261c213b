"""The Flower app's components, for `[tool.flwr.app.components]`:

    serverapp = "floral.engines.flower.app:server_app"
    clientapp = "floral.engines.flower.app:client_app"
"""

from floral.engines.flower.client import client_app
from floral.engines.flower.server import server_app

__all__ = ["client_app", "server_app"]
