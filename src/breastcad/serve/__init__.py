"""``breastcad serve``: a FastAPI web service and page around a trained model.

``create_app(model, settings)`` builds the app (see :mod:`breastcad.serve.app`);
uploads are handled in memory by :mod:`breastcad.serve.uploads`. The page's
HTML, JS and CSS are package data under ``static/``.
"""
