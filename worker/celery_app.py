"""For the plain Celery CLI: `celery -A worker.celery_app worker` (and Flower) find `app` here.

Building the app reads Settings but opens no connection.
"""

from domain.settings import get_settings
from worker.app import create_app

app = create_app(get_settings())
