"""The run report: results table, FedAvg against each baseline, task metric and validation
curves, partition, communication and time.

    from fedllm.report import write_report, format_table_text
    index_html = write_report("runs/demo")          # runs/demo/report/index.html
    print(format_table_text(summary))               # the results table for a terminal
"""

from fedllm.report.results import format_table_text, results_table
from fedllm.report.write import write_report

__all__ = ["write_report", "results_table", "format_table_text"]
