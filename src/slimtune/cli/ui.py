"""`slimtune ui`: the local web app (Train, Runs, Chat, Export, Evaluate, Compare).

slimtune ui                                   # http://127.0.0.1:7860, root: this folder
slimtune ui --root ~/finetune --port 8000
slimtune ui --host 0.0.0.0 --auth-file pass.txt   # other machines: only with a password
"""

from __future__ import annotations

import argparse
import importlib.util
import os

from slimtune.errors import SlimtuneError


def run(args: argparse.Namespace) -> int:
    from slimtune.ui.security import check_host, read_auth

    credentials = read_auth(args.auth, args.auth_file)
    check_host(args.host, credentials)
    if not 0 < args.port < 65536:
        raise SlimtuneError(f"--port {args.port} is not accepted: 1 to 65535")
    if args.max_upload_mb <= 0:
        raise SlimtuneError(f"--max-upload-mb {args.max_upload_mb} is not accepted: a number > 0")
    if importlib.util.find_spec("gradio") is None:
        raise SlimtuneError("the web app needs Gradio: pip install 'slimtune[ui]'")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from slimtune.ui.app import launch
    from slimtune.ui.common import Context
    from slimtune.ui.paths import Root

    ctx = Context(Root(args.root), max_upload_mb=args.max_upload_mb)
    print(f"slimtune ui: http://{args.host}:{args.port}  (root {ctx.root.path}; Ctrl-C stops)",
          flush=True)  # fmt: skip
    launch(ctx, args.host, args.port, credentials)
    return 0
