"""A Django app (psycopg 3) through dbopt-router, unchanged but for the SQLCommenter key naming
its end user: a database execute wrapper adds /*dbopt_user='…'*/ to every statement, the way
sqlcommenter's Django middleware tags queries per request. Runs ORM queries until the router
refuses one and prints what the application sees, as JSON.

Usage: PYTHON tests/clients/django_limits.py HOST PORT USER PASSWORD END_USER MAX_QUERIES
"""
import json
import sys
from urllib.parse import quote

import django
from django.conf import settings

host, port, user, password, end_user, max_queries = sys.argv[1:7]
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": host,
            "PORT": port,
            "NAME": "postgres",
            "USER": user,
            "PASSWORD": password,
            # Transaction pooling: no server-side cursors across transactions.
            "DISABLE_SERVER_SIDE_CURSORS": True,
        }
    },
    INSTALLED_APPS=["django.contrib.contenttypes"],
    USE_TZ=True,
)
django.setup()

import psycopg  # noqa: E402
from django.db import connection, models  # noqa: E402
from django.db.utils import OperationalError  # noqa: E402


class Note(models.Model):
    body = models.TextField()

    class Meta:
        app_label = "limits"
        db_table = "rl_notes"


def tag_end_user(execute, sql, params, many, context):
    # What a SQLCommenter middleware does: key='url-encoded value', appended as a comment.
    return execute(f"{sql} /*dbopt_user='{quote(end_user, safe='')}'*/", params, many, context)


assert psycopg.__version__.startswith("3"), psycopg.__version__
ran, refused = 0, None
with connection.execute_wrapper(tag_end_user):
    for _ in range(int(max_queries)):
        try:
            list(Note.objects.all()[:1])
            ran += 1
        except OperationalError as e:
            refused = e
            break
cause = refused.__cause__ if refused else None
diag = getattr(cause, "diag", None)
print(
    json.dumps(
        {
            "ran": ran,
            "refused": refused is not None,
            "error": type(refused).__name__ if refused else None,
            "message": str(refused) if refused else None,
            "sqlstate": getattr(cause, "sqlstate", None),
            "detail": diag.message_detail if diag else None,
            "hint": diag.message_hint if diag else None,
            "django": django.__version__,
            "psycopg": psycopg.__version__,
        }
    )
)
