"""The web pages served under ``/ui`` (see :mod:`app.routers.web`): sign in with an API key, a list
of the team's audits and jobs with live progress, the report pages with links and downloads, and a
side-by-side comparison of two audits. No external asset: inline CSS, one hashed inline script."""
