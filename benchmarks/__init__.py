"""Speed and memory measurements of the checkout beside them; not part of the installed package."""
