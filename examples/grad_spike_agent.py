"""A custom agent in under 40 lines: halve the learning rate when the gradient norm spikes (websockets only)."""

import asyncio
import json
import statistics
import sys
from collections import deque

import websockets


async def main(server: str, run_id: str, factor: float = 5.0, cooldown: int = 50) -> None:
    norms: deque[float] = deque(maxlen=100)
    quiet_until = 0
    async with websockets.connect(f"{server}/api/v1/runs/{run_id}/stream") as stream:
        async for message in stream:
            event = json.loads(message)
            for sample in event.get("samples", []) if event.get("kind") == "metrics" else []:
                norm, lr = sample["values"].get("grad_norm"), sample["values"].get("lr")
                if norm is None or lr is None:
                    continue
                median = statistics.median(norms) if len(norms) >= 20 else None
                norms.append(norm)
                if median and norm > factor * median and sample["step"] >= quiet_until:
                    reason = f"grad_norm {norm:.3g} is {norm / median:.1f}x its median; lr {lr:.3g} -> {lr / 2:.3g}"
                    command = {"type": "set_hparams", "lr": lr / 2}
                    envelope = {"command": command, "source": "agent:grad_spike", "reason": reason}
                    await stream.send(json.dumps({"op": "submit", "ref": str(sample["step"]), "envelope": envelope}))
                    print(reason, flush=True)
                    quiet_until = sample["step"] + cooldown


if __name__ == "__main__":
    asyncio.run(main(sys.argv[2] if len(sys.argv) > 2 else "ws://127.0.0.1:8765", sys.argv[1]))
