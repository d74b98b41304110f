"""`chestxpert dashboard`: the Ray dashboard's URL and the token its login prompt asks for (Ray's
token authentication is on), and `--open` to open it in a browser where this machine has one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from chestxpert.cluster.errors import UserError
from chestxpert.cluster.workspace import read_state, workspace_path


def dashboard_login(workspace: Path, address: str | None = None) -> tuple[str, str | None]:
    """The dashboard URL and its token: the local stack's (`chestxpert up` records both in the
    workspace), or `address` with the token of RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH."""
    ray = read_state(workspace).get("ray", {})
    url = address or ray.get("dashboard_url")
    if not url:
        raise UserError(
            f"no Ray dashboard recorded in {workspace}: start the local stack with "
            "`chestxpert up`, or pass a cluster's dashboard with --address http://HEAD:8265"
        )
    url = url.rstrip("/")
    if os.environ.get("RAY_AUTH_TOKEN"):
        return url, os.environ["RAY_AUTH_TOKEN"].strip()
    paths = [os.environ.get("RAY_AUTH_TOKEN_PATH")]
    if url == ray.get("dashboard_url"):
        paths.insert(0, ray.get("auth_token_path"))  # the stack's own token for its dashboard
    for path in paths:
        if path and Path(path).is_file():
            return url, Path(path).read_text().strip()
    return url, None


def _has_display() -> bool:
    """False on a Linux machine with no graphical session and no $BROWSER, where Python's
    webbrowser would fall back to a text browser in this terminal, or to nothing."""
    if os.environ.get("BROWSER"):
        return True
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def cmd_dashboard(args: argparse.Namespace) -> int:
    ws = workspace_path(args.workspace)
    url, token = dashboard_login(ws, args.address)
    print(f"dashboard: {url}")
    if token:
        print(f"token:     {token}")
        print("(paste the token into the dashboard's login prompt; keep it secret)")
    else:
        print("token:     none found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's")
    if not args.open:
        return 0
    import webbrowser

    opened = False
    if _has_display():
        try:
            opened = webbrowser.open(url)
        except webbrowser.Error:
            opened = False
    if opened:
        print("opened in a browser")
        return 0
    port = url.rsplit(":", 1)[-1] if url.count(":") == 2 else "8265"
    print(
        "no browser on this machine: open the URL on one that has one (from elsewhere, "
        f"`ssh -L {port}:127.0.0.1:{port} THIS-HOST` first)"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `chestxpert dashboard`."""
    parser = sub.add_parser(
        "dashboard",
        help="print the Ray dashboard's URL and login token (--open: open a browser)",
        description="Print the Ray dashboard's URL and the token to paste into its login "
        "prompt (Ray's token authentication is on). Default: the local stack's.",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="a cluster's dashboard URL, e.g. http://HEAD:8265 (default: the local stack's); "
        "its token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH",
    )
    parser.add_argument(
        "--open", action="store_true", help="also open the dashboard in a browser, if one exists"
    )
    parser.set_defaults(func=cmd_dashboard)
