"""The ground floor shared by every layer: the error type shown to users and the few value checks that remain
after the typed config (integrations/config.py) has checked every option's type."""
