"""A small shop, as its last migration (0003) leaves it."""
from django.db import models
from django.db.models import Q


class Customer(models.Model):
    full_name = models.CharField(max_length=100)
    email = models.EmailField(unique=True)
    vip = models.BooleanField(default=False)


class Product(models.Model):
    sku = models.CharField(max_length=20, unique=True)
    title = models.CharField(max_length=200)
    price = models.DecimalField(max_digits=10, decimal_places=2)

    class Meta:
        indexes = [models.Index(fields=["price"], name="product_price_idx")]
        constraints = [models.CheckConstraint(condition=Q(price__gte=0), name="price_non_negative")]


class Order(models.Model):
    customer = models.ForeignKey(Customer, on_delete=models.CASCADE, related_name="orders")
    created = models.DateTimeField(auto_now_add=True)
    status = models.CharField(max_length=20, default="new")
    note = models.TextField(null=True, blank=True)
    products = models.ManyToManyField(Product, related_name="orders")
