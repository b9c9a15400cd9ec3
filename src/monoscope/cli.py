"""The `monoscope` command. `monoscope serve` starts the interactive neuroscope on 127.0.0.1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _serve(args: argparse.Namespace) -> int:
    import yaml

    from monoscope.config import ConfigError, hook_name, validate_config
    from monoscope.layout import Layout
    from monoscope.serve import Neuroscope, make_server

    config_path = Path(args.config)
    if not config_path.exists():
        print(f"monoscope serve: no config file {config_path}", file=sys.stderr)
        return 2
    try:
        config = validate_config(yaml.safe_load(config_path.read_text()) or {})
        results = Layout(args.results)
        scope = Neuroscope(config["model"], hook_name(config), results, args.dictionary)
        server = make_server(scope, results, args.port)
    except (ConfigError, OSError, KeyError, ValueError) as error:  # one line, not a traceback
        filename = f": {error.filename}" if getattr(error, "filename", None) else ""
        print(f"monoscope serve: {getattr(error, 'strerror', None) or error}{filename}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"monoscope: serving dictionary '{args.dictionary}' on http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monoscope", description="Dictionary learning on language-model MLPs.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="interactive neuroscope: per-token activations of a neuron or feature")
    serve.add_argument("--results", default="results", help="the pipeline's results directory (default: results)")
    serve.add_argument("--dictionary", default="neurons", help="'neurons' or an SAE name such as x8_l1-0.0004")
    serve.add_argument("--config", default="config/config.yaml", help="the run's config (model and hook)")
    serve.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    serve.set_defaults(run=_serve)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
