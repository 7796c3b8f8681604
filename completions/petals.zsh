
#compdef petals

_petals_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _PETALS_COMPLETE=complete_zsh petals)
}

compdef _petals_completion petals

