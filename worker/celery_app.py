"""For the plain Celery CLI: `celery -A worker.celery_app worker` (and Flower) find `app` here.

Building the app reads Settings but opens no connection. Like `conveyor worker`, this entry point
renders conveyor's log events (as a library conveyor stays silent).
"""

from domain.logging import configure_logging
from domain.settings import get_settings
from worker.app import create_app

_settings = get_settings()
configure_logging(_settings.log_format, _settings.log_level)
app = create_app(_settings)
