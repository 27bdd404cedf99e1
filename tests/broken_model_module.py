"""A model module that fails while being imported (tests only)."""
raise RuntimeError("this module cannot be imported\nsecond line")
