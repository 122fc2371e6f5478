"""Rate limit under a flood: how many of N concurrent submissions a run's policy lets in.

The server runs in its own process. For each concurrency level, `N` clients (each on its own connection) submit one
command each to a fresh run at the same moment; the script prints the answers by status and the commands the store
holds. A limit that holds accepts min(N, limit) whatever N is.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from benchmarks._common import Server, base_parser, load_average, write_summary
from protocols import Policy, RateLimit, RunRegistration
from protocols.client import Client


async def flood(url: str, run_id: str, submitters: int) -> Counter[int]:
    """`submitters` clients, each on its own connection, submit one command each at the same moment."""
    start = asyncio.Event()

    async def submit(session: aiohttp.ClientSession) -> int:
        await start.wait()
        body = {"command": {"type": "pause"}, "source": "script:flood"}
        async with session.post(f"{url}/api/v1/runs/{run_id}/commands", json=body) as answer:
            await answer.read()
            return answer.status

    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) for _ in range(submitters)]
    try:
        tasks = [asyncio.create_task(submit(session)) for session in sessions]
        await asyncio.sleep(0.2)
        start.set()
        return Counter(await asyncio.gather(*tasks))
    finally:
        await asyncio.gather(*(session.close() for session in sessions))


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=120, help="the policy's commands per window (default: 120)")
    parser.add_argument("--levels", type=int, nargs="+", default=[50, 200, 1000], help="concurrent submitters")
    args = parser.parse_args()
    summary = {}
    print(f"load average before: {load_average()}")
    with Server() as server, Client(server.url) as client:
        for level in args.levels:
            policy = Policy(rate_limit=RateLimit(max_commands=args.limit, per_seconds=3600))
            run_id = client.register_run(RunRegistration(name=f"flood-{level}", policy=policy)).run_id
            answers = asyncio.run(flood(server.url, run_id, level))
            stored = len(client.list_commands(run_id, limit=10_000))
            summary[str(level)] = {"answers": dict(answers), "stored": stored}
            print(
                f"limit {args.limit}, {level:>5} concurrent: answers {dict(sorted(answers.items()))}, stored {stored}"
            )
    print(f"load average after: {load_average()}")
    write_summary(args.summary_json, summary)


if __name__ == "__main__":
    main()
