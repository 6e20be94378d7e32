"""Demo data: a catalogue with stock, a customer and an operator. Safe to load twice."""

from __future__ import annotations

from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction

from inventory.models import StockItem
from inventory.services import stock_set
from orders.models import Product

CATALOGUE = [
    ("SKU-TSHIRT", "Organic cotton T-shirt", Decimal("19.90"), 100),
    ("SKU-MUG", "Stoneware mug", Decimal("12.50"), 50),
    ("SKU-BOOK", "Designing Data-Intensive Applications", Decimal("44.00"), 20),
    ("SKU-LAMP", "Desk lamp", Decimal("39.00"), 10),
    ("SKU-RARE", "Signed first edition", Decimal("250.00"), 1),
]
CUSTOMER = ("alice", "alice@example.com", "alice-demo-password")
OPERATOR = ("operator", "operator@example.com", "operator-demo-password")


def load_catalogue() -> None:
    for sku, name, price, stock in CATALOGUE:
        with transaction.atomic(using="orders"):
            Product.objects.using("orders").update_or_create(sku=sku, defaults={"name": name, "unit_price": price})
        if not StockItem.objects.using("inventory").filter(sku=sku).exists():
            stock_set(sku=sku, on_hand=stock)


def load_demo_data() -> dict:
    load_catalogue()
    User = get_user_model()
    users = {}
    for (username, email, password), staff in ((CUSTOMER, False), (OPERATOR, True)):
        user, created = User.objects.get_or_create(username=username, defaults={"email": email, "is_staff": staff})
        if created:
            user.set_password(password)
            if staff:
                user.is_superuser = True
            user.save()
        users[username] = password
    return users
