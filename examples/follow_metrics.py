"""Follow a run's metrics in the terminal, using only the `websockets` library and runsteer's documented protocol.

python examples/follow_metrics.py RUN_ID [--server ws://127.0.0.1:8765] [--token TOKEN] [--count N]
"""

import argparse
import asyncio
import json

import websockets

SHOWN = ("loss", "eval_loss", "lr", "grad_norm", "tokens_per_s")


async def follow(server: str, run_id: str, token: str | None, count: int | None) -> None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(f"{server}/api/v1/runs/{run_id}/stream", additional_headers=headers) as stream:
        seen = 0
        async for message in stream:
            event = json.loads(message)
            if event.get("kind") != "metrics":
                continue
            for sample in event["samples"]:
                values = "  ".join(f"{k}={sample['values'][k]:.4g}" for k in SHOWN if k in sample["values"])
                flagged = f"  NON-FINITE {sample['nonfinite']}" if sample["nonfinite"] else ""
                print(f"{sample['branch']}@{sample['step']:<6} {values}{flagged}", flush=True)
                seen += 1
                if count is not None and seen >= count:
                    return


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("--server", default="ws://127.0.0.1:8765")
    parser.add_argument("--token", default=None)
    parser.add_argument("--count", type=int, default=None, help="stop after this many samples")
    args = parser.parse_args()
    asyncio.run(follow(args.server, args.run_id, args.token, args.count))
