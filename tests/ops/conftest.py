"""tests/ops: static checks of deploy/ (Prometheus, Grafana, Logstash, Kibana, compose, Kubernetes) and the docs."""

from __future__ import annotations

import sys
from pathlib import Path

# The checks share helpers in opslib.py beside this file (pytest's importlib mode puts no test folder on sys.path).
sys.path.insert(0, str(Path(__file__).parent))
