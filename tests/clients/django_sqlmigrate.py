"""The Django side of tests/tests/migrate_django.rs, on the small app in django_shop/.

Usage: PYTHON tests/clients/django_sqlmigrate.py HOST PORT DB MODE [OUTDIR]
  sql OUTDIR  write `manage.py sqlmigrate` of every migration, in order, as Flyway files
              (V1__shop_0001_initial.sql, ...) for dbopt-migrate
  check       fail when the models and the migrations disagree (makemigrations --check)
  migrate     apply the migrations with Django itself (the reference schema)
  orm         use the app through the ORM on a database migrated by someone else; prints JSON
"""
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402
from django.conf import settings  # noqa: E402

host, port, db, mode = sys.argv[1:5]
settings.configure(
    DATABASES={
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": host,
            "PORT": port,
            "NAME": db,
            "USER": "postgres",
        }
    },
    INSTALLED_APPS=["django_shop.apps.ShopConfig"],
    USE_TZ=True,
)
django.setup()

from django.core.management import call_command  # noqa: E402
from django.db import connection  # noqa: E402
from django.db.migrations.loader import MigrationLoader  # noqa: E402

if mode == "sql":
    outdir = sys.argv[5]
    loader = MigrationLoader(connection)
    plan = [key for key in loader.graph.forwards_plan(("shop", loader.graph.leaf_nodes("shop")[0][1]))]
    for i, (app, name) in enumerate(plan, start=1):
        out = io.StringIO()
        call_command("sqlmigrate", app, name, stdout=out, no_color=True)
        path = os.path.join(outdir, f"V{i}__{app}_{name}.sql")
        with open(path, "w", encoding="utf-8") as f:
            f.write(out.getvalue())
        print(path)
elif mode == "check":
    call_command("makemigrations", "shop", check=True, dry_run=True, verbosity=0)
elif mode == "migrate":
    call_command("migrate", "shop", verbosity=0)
elif mode == "orm":
    from django_shop.models import Customer, Order, Product

    ada = Customer.objects.create(full_name="Ada", email="ada@example.com", vip=True)
    tea = Product.objects.create(sku="T-1", title="Tea", price="4.50")
    cup = Product.objects.create(sku="C-1", title="Cup", price="12.00")
    order = Order.objects.create(customer=ada, status="confirmed-paid", note="gift")
    order.products.add(tea, cup)
    again = Order.objects.select_related("customer").prefetch_related("products").get(pk=order.pk)
    print(
        json.dumps(
            {
                "customer": again.customer.full_name,
                "vip": again.customer.vip,
                "status": again.status,
                "products": sorted(p.sku for p in again.products.all()),
            }
        )
    )
else:
    sys.exit(f"unknown mode {mode}")
