"""The Dash dashboard: fleet overview and the live Active Requests page."""
