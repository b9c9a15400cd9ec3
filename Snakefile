# monoscope: dictionary learning on a language model's MLP, features versus neurons.
import os

# This file is the table of contents; each stage lives in workflow/rules/<stage>.smk.

configfile: os.path.join(workflow.basedir, "config", "config.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/corpus.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/harvest.smk"
include: "workflow/rules/sae.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/autointerp.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output.index,
        rules.site.output.index,
        *([rules.compare_autointerp.output.comparison] if config["autointerp"]["enabled"] else []),
    default_target: True
