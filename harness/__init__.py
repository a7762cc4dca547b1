"""Real processes for tests, the bench and the chaos checker: redis-server (plain, replica,
Sentinel) and `hub serve`, each on a free loopback port, each dying with the process that
started it. Nothing here imports pytest: `make chaos` and the bench use it too."""
