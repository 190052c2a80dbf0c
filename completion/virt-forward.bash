# bash completion for virt-forward
# Install: copy to /usr/share/bash-completion/completions/virt-forward (or source it from ~/.bashrc).
# Guest names come from <config dir>/guests/*.toml; the config dir is --config-dir if given on
# the line, else $VIRT_FORWARD_CONFIG_DIR, else /etc/virt-forward.

_virt_forward_guests() {  # $1: config dir, $2: prefix
    local f name
    for f in "$1"/guests/*.toml; do
        [[ -f $f ]] || continue
        name=${f##*/}
        name=${name%.toml}
        [[ $name == "$2"* ]] && COMPREPLY+=("$(printf '%q' "$name")")
    done
}

_virt_forward_ports() {  # $1: guest file, $2: prefix; the strings of its `ports` (for rm)
    local line bare in_ports=0 single=0
    [[ -f $1 ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        if ((!in_ports)); then
            [[ $line =~ ^[[:space:]]*ports[[:space:]]*= ]] || continue
            in_ports=1
            line=${line#*=}
            [[ $line =~ ^[[:space:]]*\[ ]] || single=1
        fi
        line=${line%%#*}  # port specs hold no '#'
        bare=$line
        while [[ $bare =~ [\"\']([^\"\']*)[\"\'] ]]; do
            [[ ${BASH_REMATCH[1]} == "$2"* ]] && COMPREPLY+=("${BASH_REMATCH[1]}")
            bare=${bare/"${BASH_REMATCH[0]}"/}
        done
        ((single)) && break
        [[ $bare == *"]"* ]] && break  # the list's end (a ']' inside "[2001:db8::1]:80" was removed above)
    done <"$1"
}

_virt_forward() {
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local commands="hook check plan apply remove reconcile watch install uninstall status doctor add rm import"
    local globals="--config-dir --state-dir --debug --help"
    local cdir=${VIRT_FORWARD_CONFIG_DIR:-/etc/virt-forward}
    local cmd="" word i
    local -a args=()  # positional words after the command, before the cursor

    COMPREPLY=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${COMP_WORDS[i]}
        case $word in
        --config-dir | --state-dir | --address | --root | --interval | --running)
            local value=${COMP_WORDS[i + 1]}
            if [[ $value == "=" ]]; then  # --opt=value split at '=' by COMP_WORDBREAKS
                ((i++))
                value=${COMP_WORDS[i + 1]}
            fi
            ((i < COMP_CWORD - 1)) && [[ $word == --config-dir ]] && cdir=$value
            ((i++))
            ;;
        --config-dir=*) cdir=${word#*=} ;;
        -*) ;;
        *)
            if [[ -z $cmd ]]; then cmd=$word; else args+=("$word"); fi
            ;;
        esac
    done
    [[ $cdir == "~/"* ]] && cdir=$HOME/${cdir#"~/"}

    if [[ $prev == "=" && $COMP_CWORD -ge 2 ]]; then
        prev=${COMP_WORDS[COMP_CWORD - 2]}
    fi
    [[ $cur == "=" ]] && cur=""
    case $prev in
    --config-dir | --state-dir | --root)
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -d -- "$cur")
        return 0
        ;;
    --running)
        _virt_forward_guests "$cdir" "$cur"
        return 0
        ;;
    --format)
        mapfile -t COMPREPLY < <(compgen -W "text json prometheus" -- "$cur")
        return 0
        ;;
    --address | --interval) return 0 ;;
    esac

    if [[ -z $cmd ]]; then
        if [[ $cur == -* ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$globals" -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -W "$commands" -- "$cur")
        fi
        return 0
    fi

    local opts="--help"
    case $cmd in
    status) opts+=" --json --format" ;;
    install | uninstall) opts+=" --dry-run --root" ;;
    watch) opts+=" --interval" ;;
    reconcile) opts+=" --running" ;;
    add) opts+=" --address" ;;
    import) opts+=" --dry-run --force" ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$opts" -- "$cur")
        return 0
    fi

    case $cmd in
    plan | apply | remove | status)
        ((${#args[@]} == 0)) && _virt_forward_guests "$cdir" "$cur"
        ;;
    add)
        ((${#args[@]} == 0)) && _virt_forward_guests "$cdir" "$cur"
        ;;
    rm)
        if ((${#args[@]} == 0)); then
            _virt_forward_guests "$cdir" "$cur"
        else
            # ':' splits words (COMP_WORDBREAKS): complete the whole spec, insert what follows the last ':'
            local full=${COMP_WORDS[COMP_CWORD]} j=$COMP_CWORD
            [[ $full == "=" ]] && full=""
            while ((j > 2)); do
                if [[ ${COMP_WORDS[j]} == ":" ]]; then
                    full=${COMP_WORDS[j - 1]}$full
                elif [[ ${COMP_WORDS[j - 1]} == ":" ]]; then
                    full=":$full"
                else
                    break
                fi
                ((j--))
            done
            _virt_forward_ports "$cdir/guests/${args[0]}.toml" "$full"
            if [[ $full == *:* ]]; then
                for i in "${!COMPREPLY[@]}"; do COMPREPLY[i]=${COMPREPLY[i]#"${full%"${full##*:}"}"}; done
            fi
        fi
        ;;
    import)
        compopt -o filenames 2>/dev/null
        mapfile -t COMPREPLY < <(compgen -f -- "$cur")
        ;;
    esac
    return 0
}

complete -F _virt_forward virt-forward
