"""The container's health check: exit 0 when pagedserve's /health answers 200, else 1 (with the reason).

The URL is $PAGEDSERVE_HEALTH_URL if set, else http://127.0.0.1:$PAGEDSERVE_PORT/health (the port serve reads
from the same variable), else port 8000.
/health answers 200 once the models loaded at start-up are ready, and needs no API key.
Standard library only, so the image needs no curl.
"""
import os
import sys
import urllib.request

url = os.environ.get("PAGEDSERVE_HEALTH_URL") or \
    f"http://127.0.0.1:{os.environ.get('PAGEDSERVE_PORT') or 8000}/health"
try:
    with urllib.request.urlopen(url, timeout=4) as response:
        status = response.status
except Exception as error:  # noqa: BLE001 - any failure means unhealthy; say which
    print(f"{url}: {error}", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if status == 200 else 1)
