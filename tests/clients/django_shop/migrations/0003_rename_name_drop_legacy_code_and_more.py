from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("shop", "0002_order_note_product_legacy_code_and_more"),
    ]

    operations = [
        migrations.RenameField(
            model_name="customer",
            old_name="name",
            new_name="full_name",
        ),
        migrations.RemoveField(
            model_name="product",
            name="legacy_code",
        ),
        migrations.AddField(
            model_name="customer",
            name="vip",
            field=models.BooleanField(default=False),
        ),
        migrations.AlterField(
            model_name="order",
            name="status",
            field=models.CharField(default="new", max_length=20),
        ),
        migrations.AddField(
            model_name="order",
            name="products",
            field=models.ManyToManyField(related_name="orders", to="shop.product"),
        ),
    ]
