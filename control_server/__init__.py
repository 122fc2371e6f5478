"""runsteer's control server: the aiohttp hub every trainer, dashboard, agent and script talks through."""
