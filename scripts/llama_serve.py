"""Serve a GGUF model with llama.cpp's own HTTP server (the xllamacpp wheel has no CLI).

    .venv-llm/bin/python scripts/llama_serve.py --model X.gguf --alias smollm2:135m --port 18181

Prints ``READY <address>`` once the model is loaded and the server listens; SIGTERM stops it.
"""

import argparse
import signal
import threading
import time

import xllamacpp as xlc

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--model", required=True)
parser.add_argument("--alias")
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=18181)
parser.add_argument("--ctx", type=int, default=2048)
parser.add_argument("--parallel", type=int, default=2)
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--embedding", action="store_true")
args = parser.parse_args()

params = xlc.CommonParams()
params.model.path = args.model
params.hostnames = [args.host]
params.port = args.port
params.n_ctx = args.ctx
params.n_parallel = args.parallel
params.cpuparams.n_threads = args.threads
params.cpuparams_batch.n_threads = args.threads
params.offline = True
if args.alias:
    params.model_alias = {args.alias}
if args.embedding:
    params.embedding = True
    # OpenAI-style /v1/embeddings needs one pooled vector per input.
    params.pooling_type = xlc.llama_pooling_type.LLAMA_POOLING_TYPE_MEAN
started = time.time()
server = xlc.Server(params)  # returns once the model is loaded and the server listens
print(f"READY {server.listening_address} in {time.time() - started:.2f}s", flush=True)
stop = threading.Event()
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
stop.wait()
del server
