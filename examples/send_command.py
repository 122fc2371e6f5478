"""Send a command over the websocket and wait for its result, using only `websockets` and the documented protocol.

python examples/send_command.py RUN_ID '{"type": "set_hparams", "lr": 0.0003}' [--reason WHY] [--server ws://...]
"""

import argparse
import asyncio
import json
import sys

import websockets

FINAL = {"applied", "rejected", "failed"}


async def send(
    server: str, run_id: str, command: dict[str, object], reason: str, token: str | None
) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with websockets.connect(f"{server}/api/v1/runs/{run_id}/stream", additional_headers=headers) as stream:
        envelope = {"command": command, "source": "script:send_command", "reason": reason}
        await stream.send(json.dumps({"op": "submit", "ref": "1", "envelope": envelope}))
        command_id = None
        async for message in stream:
            data = json.loads(message)
            if data.get("op") == "reply" and data["ref"] == "1":
                if data["error"]:
                    return {"status": "refused", **data["error"]}
                command_id = data["record"]["id"]
                print(f"queued as #{data['record']['seq']} ({command_id})", flush=True)
            elif data.get("kind") == "command" and data["record"]["id"] == command_id:
                if data["record"]["status"] in FINAL:
                    return data["record"]
    raise ConnectionError("the stream closed before the command finished")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_id")
    parser.add_argument("command", help="the command as JSON")
    parser.add_argument("--reason", default="")
    parser.add_argument("--server", default="ws://127.0.0.1:8765")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()
    result = asyncio.run(send(args.server, args.run_id, json.loads(args.command), args.reason, args.token))
    print(json.dumps(result, indent=2))
    sys.exit(0 if result["status"] == "applied" else 1)
