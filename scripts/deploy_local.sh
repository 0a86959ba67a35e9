#!/usr/bin/env bash
# A local Flower Deployment Engine on loopback: one SuperLink and N SuperNodes, for manual use.
#
#   scripts/deploy_local.sh start 2            # SuperLink + 2 SuperNodes (partition-id 0..1 of 2)
#   scripts/deploy_local.sh start 2 --secure   # TLS, SuperNode auth, authenticated executors
#   scripts/deploy_local.sh start 2 --warm     # one long-lived ClientApp process per SuperNode
#   scripts/deploy_local.sh status             # their processes, and the nodes the SuperLink sees
#   scripts/deploy_local.sh stop               # stop them, by the PIDs recorded at start
#
# It runs `python -m deploy.local` (deploy/local.py: settings, files, what --secure protects)
# with the repository's virtual environment when there is one.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${FLOWER_BIN:-$REPO/.venv/bin}/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m deploy.local "$@"
