"""The job dashboard (`vlctl ui`): a read-only web page for jobs, ranks and recoveries, and its JSON API.

`data` builds the documents from the store's read model (controller.views) and the run folder; `app` is the
Starlette app (routes, the token gate, security headers); `server` runs it under uvicorn, alone or beside the
reconcile loop. The page (static/) draws with plotly.js from the `plotly` package: nothing is fetched from
outside, so it works offline. docs/ui.md documents the pages and the API.
"""

from .app import DashboardConfig, create_app, is_loopback
from .server import DashboardServer

__all__ = ["DashboardConfig", "DashboardServer", "create_app", "is_loopback"]
