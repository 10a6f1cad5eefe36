"""Slides -> tissue -> tiles -> datasets. Heavy readers (tiffslide, openslide, datasets) load lazily."""
