"""A real Django app through dbopt-router over TLS (sslmode=require): migrate-free model use.

Usage: /usr/bin/python3 tests/python/django_tls.py HOST PORT USER PASSWORD

Creates its table with SQL (Django's schema editor would work too, but keeps this short), saves
and reads model rows, and checks with libpq that the connection to the router is encrypted.
Prints "django ok" and exits 0 on success.
"""
import sys

import django
from django.conf import settings

host, port, user, password = sys.argv[1:5]
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": host,
            "PORT": port,
            "NAME": "postgres",
            "USER": user,
            "PASSWORD": password,
            "OPTIONS": {"sslmode": "require"},
            # Transaction pooling: no server-side cursors across transactions.
            "DISABLE_SERVER_SIDE_CURSORS": True,
        }
    },
    INSTALLED_APPS=["django.contrib.contenttypes"],
    USE_TZ=True,
    TIME_ZONE="Asia/Tokyo",
)
django.setup()

from django.db import connection, models, transaction  # noqa: E402


class Note(models.Model):
    body = models.TextField()
    created = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "contenttypes"
        db_table = "django_tls_note"


with connection.cursor() as cur:
    cur.execute(
        "CREATE TABLE IF NOT EXISTS django_tls_note "
        "(id serial PRIMARY KEY, body text NOT NULL, created timestamptz NOT NULL)"
    )
    cur.execute("TRUNCATE django_tls_note")

# libpq's own view of the client connection: encrypted.
assert connection.connection.info.ssl_in_use, "the connection to the router is not TLS"

with transaction.atomic():
    for i in range(20):
        Note.objects.create(body=f"note {i}")
assert Note.objects.count() == 20, Note.objects.count()
first = Note.objects.order_by("id").first()
assert first.body == "note 0"
# The session time zone Django set (UTC, as it always does with USE_TZ) came back correctly:
# an aware datetime within a minute of now.
import datetime  # noqa: E402

delta = abs((datetime.datetime.now(datetime.timezone.utc) - first.created).total_seconds())
assert delta < 60, (first.created, delta)
print("django ok")
