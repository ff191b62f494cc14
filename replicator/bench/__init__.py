"""The benchmark suite: `python -m replicator.bench` (suite.py), the fleet simulator
(fleet.py), what both share (kit.py) and the PgBouncer they and the tests start.

Tooling, not the product: a checkout runs it (pip install -e .), the wheel leaves it out
(pyproject.toml names the packages it ships), so `pip install replicator` on a store's
server carries no benchmark code.
"""
