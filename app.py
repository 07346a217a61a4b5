"""Zoo Composer web app: `python app.py` serves it on http://127.0.0.1:7860 (this machine only).

Options: --host/--port, --runs-root (where fitted and fine-tuned runs go), --data-root and
--model-root (the only folders the app reads data and local anchors from; repeat them),
--max-upload, --offline. Everything else lives in composer/ui/.
"""
from __future__ import annotations

import argparse
import os

# Quiet: no analytics. The Hub is used when reachable (users have the network); --offline skips it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=None, help="port (default: first free from 7860)")
    p.add_argument("--runs-root", default=None, help="folder for the app's runs (default ~/.cache/zoo-composer/app-runs)")
    p.add_argument("--data-root", action="append", default=None, help="folder whose ImageFolders may be used (repeatable)")
    p.add_argument("--model-root", action="append", default=None, help="folder of local-dir: anchors (repeatable)")
    p.add_argument("--max-upload", default="20mb", help="largest accepted upload (default 20mb)")
    p.add_argument("--offline", action="store_true", help="never contact the Hub: cached, local and starter families only")
    args = p.parse_args()
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"

    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))   # leave the web server a core while jobs run

    from composer.ui import build_app, default_config, launch
    config = default_config(args.runs_root, args.data_root, args.model_root)
    launch(build_app(config), host=args.host, port=args.port, max_upload=args.max_upload)


if __name__ == "__main__":
    main()
