"""``edge-agent diagnose``: what is wrong with this gateway, and what to do about it.

Each check has a stable id and a result (ok, warning, error, or skipped with
the reason), a one-line finding and, unless it passed, a remedy. The report
renders as 80-column ASCII for a serial terminal or as JSON.

``runner.run_diagnosis`` runs the checks; ``render`` formats the report. This
package file imports nothing, so that ``edge-agent --help`` stays fast.
"""
