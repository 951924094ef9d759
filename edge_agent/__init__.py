"""edge-agent: telemetry for IoT edge gateways over SPKI-pinned mutual TLS."""

import datetime
import logging

__version__ = "0.1.0"

# A clock earlier than this date cannot be right, because this release did
# not exist yet. Gateways without an RTC boot in 1970 until NTP responds.
BUILD_DATE = datetime.datetime(2026, 12, 1, tzinfo=datetime.timezone.utc)

logging.getLogger(__name__).addHandler(logging.NullHandler())
