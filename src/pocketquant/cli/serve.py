"""`pocketquant serve MODEL [--host 127.0.0.1] [--port 8000] [--parallel 4] [--ctx 2048]`: an OpenAI-compatible
server; up to --parallel requests decode together, --queue more wait, the rest get 503. One line per request
goes to standard error."""

from __future__ import annotations

from pocketquant.cli.common import add_model_options


def register(p):
    add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--parallel", type=int, default=4, help="sequences decoded together, each with its own KV cache")
    p.add_argument("--ctx", type=int, default=2048, help="context of each sequence (default 2048, at most the model's)")
    p.add_argument("--queue", type=int, default=64, help="requests that may wait for a slot (default 64)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 requests")
    p.add_argument("--name", default=None, help="the model id clients name (default: MODEL as given)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the temperature of requests that name none (default 1.0, OpenAI's default; 0 = greedy, "
                        "as generate and chat are by default)")
    p.add_argument("--read-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="a request's headers, and then its body, must arrive within this time (default 15)")
    p.add_argument("--max-client-connections", type=int, default=None, metavar="N",
                   help="connections one client address may hold (default: --parallel + --queue, all the server "
                        "takes at once; lower it where many clients share the server)")
    p.set_defaults(run=run)


def run(args) -> int:
    import logging
    import signal
    import threading
    import time

    from pocketquant.cli.common import open_model
    from pocketquant.errors import PocketQuantError
    from pocketquant.runtime.batch import BatchEngine
    from pocketquant.server.app import create_app
    from pocketquant.server.http import make_server

    per_client = args.max_client_connections
    per_client = args.parallel + args.queue if per_client is None else per_client
    for name, value in (("parallel", args.parallel), ("ctx", args.ctx), ("queue", args.queue),
                        ("max-client-connections", per_client)):
        if value < 1:
            raise PocketQuantError(f"--{name} must be at least 1, got {value}")
    if not 0 < args.port < 65536:
        raise PocketQuantError(f"--port must be in 1..65535, got {args.port}")
    if not 0 < args.read_timeout <= 3600:
        raise PocketQuantError(f"--read-timeout must be in (0, 3600] seconds, got {args.read_timeout}")
    if not 0 <= args.temperature <= 2:  # OpenAI's range; also refuses NaN
        raise PocketQuantError(f"--temperature must be in [0, 2], got {args.temperature}")
    loaded = open_model(args)
    context = min(args.ctx, loaded.model.config.max_seq_len)
    engine = BatchEngine(loaded.model, args.parallel, context, args.queue, thread=False)
    app = create_app(engine, loaded.tokenizer, args.name or args.model, args.api_key, args.temperature,
                     args.read_timeout)
    server = make_server(app, args.host, args.port, per_client, args.read_timeout)
    logging.basicConfig(format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("pocketquant.serve").setLevel(logging.INFO)
    # HTTP runs on a thread of its own and the model stays on this one, which loaded it. OpenMP keeps a pool
    # of worker threads for each thread that starts parallel work; with a second pool (the model stepped on
    # another thread) there are more OpenMP threads than cores on a small machine, and its workers then sleep
    # in the kernel at every parallel region instead of spinning: a prefill took several times longer.
    failures = []

    def serve_http():
        try:
            server.run()
        except Exception as e:  # reported here once the engine has stopped
            failures.append(e)
    http = threading.Thread(target=serve_http, name="pocketquant-http", daemon=True)

    def stop(signum, frame):  # the first Ctrl-C lets streams finish; a second one ends them
        server.force_exit = server.should_exit
        server.should_exit = True
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    http.start()
    while not server.started and http.is_alive():  # say so only once the socket accepts connections
        time.sleep(0.01)
    if server.started:
        print(f"serving {args.name or args.model} at http://{args.host}:{args.port}/v1 ({args.parallel} slots of "
              f"{context:,} tokens)", flush=True)
    engine.run(running=http.is_alive)
    http.join()
    if failures:
        raise PocketQuantError(f"the HTTP server failed: {failures[0]!r}") from failures[0]
    if not server.started:
        raise PocketQuantError(f"could not serve at {args.host}:{args.port} (see the message above)")
    return 0
