"""Run hubspot.wasm outside the Rust host, with the wasmtime Python bindings.

A quick check that the built component instantiates and parses, and a way to
measure the memory it needs. Not a substitute for the host's own
`crm-event-handler plugin check` / `plugin run`.

    .venv/bin/pip install -r requirements-dev.txt
    .venv/bin/python run_component.py ../payloads/hubspot-qualified.json
    .venv/bin/python run_component.py -H 'x-hubspot-event: deal.creation' body.json
    .venv/bin/python run_component.py --memory-mb 48 ../payloads/*.json
    .venv/bin/python run_component.py --find-min-memory ../payloads/hubspot-qualified.json

Each payload is parsed in a fresh store (as the host does: one store per
call), with every linear memory capped at --memory-mb, like the host's
`[limits] memory_mb`. Prints one JSON line per payload: {"ok": event} or
{"err": parse-error}, plus the wall time of instantiate + call.
"""

import argparse
import json
import os
import sys
import time

import wasmtime
from wasmtime import component as cm

HERE = os.path.dirname(os.path.abspath(__file__))


def plain(v):
    """wasmtime component values -> JSON-friendly Python values."""
    if isinstance(v, cm.Variant):
        return {v.tag: plain(v.payload)}
    if isinstance(v, cm.Record):
        return {k: plain(x) for k, x in vars(v).items()}
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


class Runner:
    def __init__(self, wasm_path):
        config = wasmtime.Config()
        config.cache = True  # wasmtime's default cache dir: compile once, not every run
        self.engine = wasmtime.Engine(config)
        t0 = time.monotonic()
        self.component = cm.Component.from_file(self.engine, wasm_path)
        self.compile_s = time.monotonic() - t0
        self.linker = cm.Linker(self.engine)
        self.linker.add_wasip2()
        self.logs = []
        with self.linker.root() as root:
            with root.add_instance("crm:plugin/config@0.1.0") as config:
                config.add_func("get", lambda store, key: None)
            with root.add_instance("crm:plugin/log@0.1.0") as log:
                log.add_func("log", lambda store, level, message: self.logs.append((level, message)))

    def parse(self, headers, body, memory_mb):
        store = wasmtime.Store(self.engine)
        store.set_wasi(wasmtime.WasiConfig())  # no preopens, no env, no args
        store.set_limits(memory_size=memory_mb << 20)
        t0 = time.monotonic()
        instance = self.linker.instantiate(store, self.component)
        t1 = time.monotonic()
        parse = instance.get_func(store, "parse")
        hs = []
        for name, value in headers:
            h = cm.Record()
            setattr(h, "name", name)
            setattr(h, "value", value)
            hs.append(h)
        result = parse(store, hs, body)
        parse.post_return(store)
        t2 = time.monotonic()
        return result, t1 - t0, t2 - t1


def outcome(result):
    v = plain(result)
    # result<crm-event, parse-error>: the event is a record, the error a variant.
    if isinstance(v, dict) and "reference" in v:
        return {"ok": v}
    return {"err": v}


def fits(runner, headers, body, memory_mb):
    try:
        runner.parse(headers, body, memory_mb)
        return True
    except (wasmtime.WasmtimeError, wasmtime.Trap):
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("payloads", nargs="+")
    ap.add_argument("-H", "--header", action="append", default=[], help='"name: value" (repeatable)')
    ap.add_argument("--wasm", default=os.path.join(HERE, "hubspot.wasm"))
    ap.add_argument("--memory-mb", type=int, default=256)
    ap.add_argument("--find-min-memory", action="store_true", help="bisect the smallest memory_mb that works")
    args = ap.parse_args()

    headers = []
    for h in args.header:
        name, _, value = h.partition(":")
        headers.append((name.strip().lower(), value.strip()))

    runner = Runner(args.wasm)
    print(f"# compiled {args.wasm} in {runner.compile_s:.2f} s", file=sys.stderr)
    for path in args.payloads:
        with open(path, "rb") as f:
            body = f.read()
        if args.find_min_memory:
            lo, hi = 1, 256  # lo fails (or is untested), hi works
            if not fits(runner, headers, body, hi):
                print(json.dumps({"payload": path, "min_memory_mb": None, "note": "fails even at 256"}))
                continue
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if fits(runner, headers, body, mid):
                    hi = mid
                else:
                    lo = mid
            print(json.dumps({"payload": path, "min_memory_mb": hi}))
            continue
        result, inst_s, call_s = runner.parse(headers, body, args.memory_mb)
        line = {"payload": path, **outcome(result), "instantiate_ms": round(inst_s * 1000, 1), "call_ms": round(call_s * 1000, 1)}
        print(json.dumps(line))
    for level, message in runner.logs:
        print(f"# plugin log [{plain(level)}] {message}", file=sys.stderr)


if __name__ == "__main__":
    main()
