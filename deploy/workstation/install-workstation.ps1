<#
.SYNOPSIS
  Install the DMZ Relay workstation for the current user and run it at every logon.

.DESCRIPTION
  Creates a virtualenv in %LOCALAPPDATA%\dmz-relay\venv, installs the wheel (or the
  package named) into it, puts the config at %LOCALAPPDATA%\dmz-relay\workstation.yaml
  (unless one is there), and registers the scheduled task of relay-workstation.xml:
  at logon, as this user, least privilege, no console window (pythonw.exe), JSON logs in
  %LOCALAPPDATA%\dmz-relay\logs\workstation.log. No administrator rights needed.
  -Uninstall stops the workstation cleanly (relay workstation stop) and removes the task.

.EXAMPLE
  powershell -ExecutionPolicy Bypass -File install-workstation.ps1 -Package .\dmz_relay-0.1.0-py3-none-any.whl -Config .\workstation.yaml
#>
param(
  [string]$Package = "dmz-relay",
  [string]$Config = "",
  [string]$Python = "py",
  [switch]$Uninstall
)
$ErrorActionPreference = "Stop"
$TaskName = "DMZ Relay workstation"
$Base = Join-Path $env:LOCALAPPDATA "dmz-relay"
$Venv = Join-Path $Base "venv"
$PythonW = Join-Path $Venv "Scripts\pythonw.exe"
$Relay = Join-Path $Venv "Scripts\relay.exe"
$Target = Join-Path $Base "workstation.yaml"
$Logs = Join-Path $Base "logs"

if ($Uninstall) {
  if (Test-Path $Relay) { & $Relay workstation stop --config $Target }
  Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false -ErrorAction SilentlyContinue
  Write-Host "removed the task '$TaskName' (the virtualenv and state in $Base stay)"
  exit 0
}

New-Item -ItemType Directory -Force -Path $Base, $Logs | Out-Null
if (-not (Test-Path $PythonW)) {
  if ($Python -eq "py") { & py -3 -m venv $Venv } else { & $Python -m venv $Venv }
  if ($LASTEXITCODE -ne 0) { throw "cannot create the virtualenv in $Venv (Python 3.11+ needed)" }
}
& (Join-Path $Venv "Scripts\python.exe") -m pip install --upgrade $Package
if ($LASTEXITCODE -ne 0) { throw "pip install $Package failed" }

if ($Config -ne "") { Copy-Item -Path $Config -Destination $Target -Force }
if (-not (Test-Path $Target)) { throw "no config: pass -Config path\to\workstation.yaml" }

$UserId = [System.Security.Principal.WindowsIdentity]::GetCurrent().Name
$Xml = Get-Content -Raw -Path (Join-Path $PSScriptRoot "relay-workstation.xml")
$Xml = $Xml.Replace("USER_ID", [System.Security.SecurityElement]::Escape($UserId))
$Xml = $Xml.Replace("PYTHONW", [System.Security.SecurityElement]::Escape($PythonW))
$Xml = $Xml.Replace("LOG_FILE", [System.Security.SecurityElement]::Escape((Join-Path $Logs "workstation.log")))
$Xml = $Xml.Replace("CONFIG", [System.Security.SecurityElement]::Escape($Target))
Register-ScheduledTask -TaskName $TaskName -Xml $Xml -Force | Out-Null
Start-ScheduledTask -TaskName $TaskName
Write-Host "registered '$TaskName': runs at logon; started now. Check: $Relay workstation status --config `"$Target`""
