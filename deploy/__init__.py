"""Deployment tooling: a local Flower Deployment Engine, its executors, and what keeps it private.

``deploy.local`` starts a SuperLink and N SuperNodes on loopback (optionally with TLS, SuperNode
authentication and authenticated executors: ``--secure``; optionally with one warm ClientApp
process per SuperNode: ``--warm``), records their PIDs and stops them by PID. The script, the
tests and the benchmarks all start deployments through it. See docs/security.md for what a
``--secure`` deployment protects and what it does not.
"""
