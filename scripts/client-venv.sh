#!/usr/bin/env bash
# Makes .venv-clients: the real HTTP clients the server tests drive (openai, requests, playwright), pinned
# in tests/clients/requirements.txt. Idempotent; the tests run it themselves when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-clients
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import openai, requests, playwright" 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
