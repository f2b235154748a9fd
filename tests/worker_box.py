"""A module-level box that worker processes use to hold objects between test calls."""
box: dict = {}
