"""Operating a service tree: the status server, its metrics, its page, systemd notify.

Read from the tree through public properties only (state, children, restart counts, timer
statistics, health, Diag flags), at the moment of each request.
"""

from ._server import StatusServer as StatusServer
from ._server import check_host as check_host
from ._server import check_port as check_port

__all__ = ["StatusServer", "check_host", "check_port"]
