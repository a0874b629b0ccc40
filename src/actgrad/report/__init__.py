"""The figures and the HTML report, drawn and rendered from the summary's tables."""
